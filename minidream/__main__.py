"""`python -m minidream`: the same command as `minidream` (what `torchrun -m minidream train ...` runs)."""
from cli import main

main()
