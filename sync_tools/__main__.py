from sync_tools.cli import main

main()
