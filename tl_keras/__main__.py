"""`python -m tl_keras COMMAND ...` is the same as `tl-keras COMMAND ...`."""

from tl_keras.cli import run

if __name__ == "__main__":
    run()
