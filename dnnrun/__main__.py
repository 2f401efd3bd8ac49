from dnnrun.cli import console

console()
