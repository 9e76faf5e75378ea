"""Typed settings for turboserve; see configs/settings.py and configs/default.yaml."""

from configs.settings import ModelSettings, SchedulerSettings, ServerSettings, Settings, load_settings

__all__ = ["ModelSettings", "SchedulerSettings", "ServerSettings", "Settings", "load_settings"]
