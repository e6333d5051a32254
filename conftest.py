"""Set up once for every test file: the GPT-2 tokenizer works offline, in subprocesses too."""
import os

# tiktoken reads TIKTOKEN_CACHE_DIR relative to the working directory, and tests start scripts in
# temporary folders: make it absolute (default: the cached GPT-2 files in ../shared)
_here = os.path.dirname(os.path.abspath(__file__))
os.environ["TIKTOKEN_CACHE_DIR"] = os.path.abspath(
    os.environ.get("TIKTOKEN_CACHE_DIR") or os.path.join(_here, "..", "shared", "tiktoken_cache"))
