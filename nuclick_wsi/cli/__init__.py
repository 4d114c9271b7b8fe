from nuclick_wsi.cli.main import main

__all__ = ["main"]
