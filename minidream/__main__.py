"""`python -m minidream`: the same command as `minidream` (what `torchrun -m minidream train ...` runs)."""
from minidream.cli import main

main()
