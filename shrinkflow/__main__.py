from shrinkflow.cli import main

main()
