from scalebio_cli.cli import main

main()
