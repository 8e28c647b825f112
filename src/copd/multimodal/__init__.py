"""Images and videos: media files, the vision-language processor and tiny Qwen-VL builds, pixel inputs and M-RoPE positions."""
