from nuclick_wsi.cli.main import main

main()
