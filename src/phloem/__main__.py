from phloem.cli.main import main

main()
