from dnnrun.entry import console

console()
