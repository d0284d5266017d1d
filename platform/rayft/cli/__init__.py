"""The `rayft` command line (app) and what it prints (views, plan_view, preview, chat)."""

from rayft.cli.app import app

__all__ = ["app"]
