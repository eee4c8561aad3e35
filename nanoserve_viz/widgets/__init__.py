"""The visualizer's panels, one widget per file: timeline, kv_pages, lanes, metrics; plus the status
line, the help and error screens, and the style cache the Line API widgets share."""
