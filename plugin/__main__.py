"""``python -m histosynth …`` (and ``accelerate launch -m histosynth train …``)."""

from histosynth.cli import main

if __name__ == "__main__":
    main(prog_name="histosynth")
