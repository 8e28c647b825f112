"""`VLProcessor`: what a vision-language policy holds where a text policy holds its tokenizer.

Two routes build the model inputs of prompts with images and videos, and give the same
ids, token types and grids (pixels agree within resampling differences):
  - with torchvision, the checkpoint's own processor (`AutoProcessor` from the model folder),
    called with copd's sampled frames and their video metadata (fps and source frame
    indices, from which Qwen3-VL's timestamps follow) and `do_sample_frames=False`;
  - without it (the family's Processor classes need torchvision), copd.multimodal.inputs'
    manual route: the PIL image processor, the family's frame resizing, patches arranged
    in the video processor's layout, and the placeholders expanded as the processor does.
Both read and write one model folder: the tokenizer with its chat template, and
`processor_config.json` with the image processor, the video processor's settings and the
processor class, as transformers saves them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer
from transformers.utils import is_torchvision_available

from copd.multimodal.families import FAMILIES, IMAGE_PAD, VIDEO_PAD, VLFamily, family
from copd.multimodal.inputs import PIXEL_KEYS, check_placeholders, encode_manual, token_types
from copd.multimodal.media import Video

ROUTES = ("auto", "processor", "manual")
# What a saved image processor is called in a processor folder: the class AutoProcessor builds
# with torchvision (without it, AutoImageProcessor maps the name to the PIL class).
TORCHVISION_IMAGE_PROCESSOR = "Qwen2VLImageProcessor"


class VLProcessor:
    """A vision-language model's tokenizer, image processor and video settings, and its own processor when available.

    `video_settings` is the video processor's configuration (size, patch sizes, mean and
    std, frame sampling defaults) as a dict, which the manual route reads without
    torchvision. `processor` is the transformers processor, or None for the manual route.
    """

    def __init__(self, fam: VLFamily, tokenizer, image_processor, video_settings: dict, processor=None):
        self.family, self.tokenizer, self.image_processor = fam, tokenizer, image_processor
        self.video_settings, self.processor = video_settings, processor

    @classmethod
    def manual(cls, model_type: str, tokenizer, image_processor, video_settings: dict) -> VLProcessor:
        return cls(family(model_type), tokenizer, image_processor, video_settings)

    route = property(lambda self: "manual" if self.processor is None else "processor")
    # what a policy reads of a tokenizer
    eos_token_id = property(lambda self: self.tokenizer.eos_token_id)
    pad_token_id = property(lambda self: self.tokenizer.pad_token_id)
    chat_template = property(lambda self: self.tokenizer.chat_template)
    image_token_id = property(lambda self: self.tokenizer.convert_tokens_to_ids(IMAGE_PAD))
    video_token_id = property(lambda self: self.tokenizer.convert_tokens_to_ids(VIDEO_PAD))

    @property
    def padding_side(self) -> str:
        return self.tokenizer.padding_side

    @padding_side.setter
    def padding_side(self, side: str) -> None:
        self.tokenizer.padding_side = side

    def __len__(self) -> int:
        return len(self.tokenizer)

    def get_vocab(self) -> dict[str, int]:
        return self.tokenizer.get_vocab()

    def apply_chat_template(self, messages, **kwargs):
        return self.tokenizer.apply_chat_template(messages, **kwargs)

    def batch_decode(self, ids, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(ids, **kwargs)

    def set_pixels(self, image: tuple[int | None, int | None], video: tuple[int | None, int | None]) -> None:
        """The (min, max) pixel areas images and videos are resized within; None keeps the saved value."""
        if any(image):
            self.image_processor.size = _pixel_range(self.image_processor.size, *image)
        if any(video):
            self.video_settings["size"] = _pixel_range(self.video_settings["size"], *video)
            if self.processor is not None:  # self.image_processor is the processor's own already
                self.processor.video_processor.size = self.video_settings["size"]

    def encode(self, texts: list[str], images: list[list], videos: list[list[Video]]) -> dict:
        """Left-padded model inputs of texts with placeholder blocks, their PIL images and their videos."""
        if self.processor is None:
            return encode_manual(texts, images, videos, self.tokenizer, self.image_processor, self.video_settings,
                                 self.family)
        return self._encode_with_processor(texts, images, videos)

    def _encode_with_processor(self, texts, images, videos) -> dict:
        flat_images = [im for row in images for im in row]
        flat_videos = [v for row in videos for v in row]
        for row_text, row_images, row_videos in zip(texts, images, videos, strict=True):
            check_placeholders(row_text, IMAGE_PAD, len(row_images), "image")
            check_placeholders(row_text, VIDEO_PAD, len(row_videos), "video")
        kwargs = {"images": flat_images or None}
        if flat_videos:
            kwargs.update(videos=[v.frames for v in flat_videos], video_metadata=[v.metadata() for v in flat_videos],
                          do_sample_frames=False, **self.family.video_call)
        out = self.processor(text=texts, padding=True, padding_side="left", return_tensors="pt", **kwargs)
        encoded = {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"],
                   "mm_token_type_ids": token_types(out["input_ids"], self.image_token_id, self.video_token_id)}
        encoded.update({k: torch.as_tensor(out[k]) for k in PIXEL_KEYS if out.get(k) is not None})
        return encoded

    # ---- the model folder ------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path) -> None:
        """The processor's files, in transformers' layout (processor_config.json) and the older one."""
        if self.processor is not None:
            self.processor.save_pretrained(folder)
        else:
            self.tokenizer.save_pretrained(folder)
            image = {**self.image_processor.to_dict(), "image_processor_type": TORCHVISION_IMAGE_PROCESSOR}
            config = {"processor_class": self.family.processor_class, "image_processor": image,
                      "video_processor": {**self.video_settings, "video_processor_type": self.family.video_processor_type}}
            _write_json(Path(folder, "processor_config.json"), config)
        # preprocessor_config.json and video_preprocessor_config.json, what transformers 4.x and
        # the serving engines built on it read.
        saved = json.loads(Path(folder, "processor_config.json").read_text())
        _write_json(Path(folder, "preprocessor_config.json"), saved["image_processor"])
        _write_json(Path(folder, "video_preprocessor_config.json"), saved["video_processor"])

    @classmethod
    def from_pretrained(cls, folder: str | Path, route: str = "auto") -> VLProcessor:
        """The processor of a model folder: with torchvision (route auto) the checkpoint's own, else the manual route."""
        if route not in ROUTES:
            raise ValueError(f"unknown processor route {route!r}; expected one of {ROUTES}")
        fam = family(AutoConfig.from_pretrained(folder).model_type)
        if route == "processor" or (route == "auto" and is_torchvision_available()):
            from transformers import AutoProcessor

            processor = AutoProcessor.from_pretrained(folder)
            settings = processor.video_processor.to_dict()
            return cls(fam, processor.tokenizer, processor.image_processor, settings, processor)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        if tokenizer.chat_template is None:
            tokenizer.chat_template = _folder_chat_template(Path(folder))
        # The PIL class even where torchvision imports, so this route is the same everywhere.
        image_processor = AutoImageProcessor.from_pretrained(folder, backend="pil")
        return cls(fam, tokenizer, image_processor, _video_settings(folder, image_processor))


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _pixel_range(size, low: int | None, high: int | None) -> dict:
    return {"shortest_edge": low or size["shortest_edge"], "longest_edge": high or size["longest_edge"]}


def _video_settings(folder: str | Path, image_processor) -> dict:
    """The saved video processor's configuration, read without torchvision; else the image processor's."""
    from transformers.video_processing_utils import BaseVideoProcessor

    try:
        settings, _ = BaseVideoProcessor.get_video_processor_dict(folder)
    except OSError:  # a folder saved before video settings were: frames are read like images
        settings = {}
    if "size" not in settings:
        settings.update({k: getattr(image_processor, k) for k in (
            "patch_size", "merge_size", "temporal_patch_size", "image_mean", "image_std")})
        settings["size"] = {"shortest_edge": image_processor.size["shortest_edge"],
                            "longest_edge": image_processor.size["longest_edge"]}
    return settings


def _folder_chat_template(folder: Path) -> str | None:
    """A checkpoint's chat template from chat_template.jinja or chat_template.json (AutoTokenizer reads neither)."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    if (folder / "chat_template.json").is_file():
        return json.loads((folder / "chat_template.json").read_text()).get("chat_template")
    return None


def is_vision_language(config) -> bool:
    """Whether a transformers config is a vision-language model copd drives (copd.multimodal.families)."""
    return getattr(config, "model_type", None) in FAMILIES
