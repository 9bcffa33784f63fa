from epoxi.cli import main

main()
