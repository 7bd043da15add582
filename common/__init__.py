"""What every floor of the toolkit may use (lora/, models/, data/, the entry points): the error
class that marks a mistake the user can fix."""
