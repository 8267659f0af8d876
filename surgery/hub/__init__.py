"""Floor 5: publishing to the Hugging Face Hub."""

from surgery.hub.push import PushResult, check_complete, push_folder

__all__ = ["PushResult", "check_complete", "push_folder"]
