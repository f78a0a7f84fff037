from lightgen.cli import main

main()
