"""Text features and text encoders."""
