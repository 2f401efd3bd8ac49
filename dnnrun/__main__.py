from dnnrun.cli import main

main()
