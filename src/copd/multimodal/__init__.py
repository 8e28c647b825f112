"""Images and videos: media files and frame sampling, the vision-language families, their processor routes,
tiny Qwen-VL builds, pixel inputs and M-RoPE positions."""
