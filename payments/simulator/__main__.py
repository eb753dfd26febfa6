"""``python -m payments.simulator``: the simulator on a port."""

from .app import main

if __name__ == "__main__":
    main()
