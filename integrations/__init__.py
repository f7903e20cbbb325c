"""Where users meet fastattr: diffusers callbacks, ComfyUI nodes and the demo."""
