"""Built-in data written for contrans_tl: emotion scenarios and neutral alignment text."""
