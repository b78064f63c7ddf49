"""`python -m gpuphase`: the same command line as the `gpuphase` script."""

from gpuphase.cli import main

main()
