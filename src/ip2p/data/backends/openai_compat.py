"""The `openai` backend: any OpenAI-compatible endpoint (vLLM, Ollama, OpenAI) over plain HTTP.

POST {base_url}/chat/completions (few-shot chat: human examples as user/assistant turns) or
{base_url}/completions (few-shot text prompt in the fine-tuning format, for a tuned base model).
Decoding (`instructions.decoding`) follows the paper: temperature 0.7, top_p 1.0, max 256 tokens, frequency penalty 0.1,
stop "\\nEND"; each request carries its per-record seed.

- Bounded concurrency: a thread pool of `concurrency` workers per batch.
- Retries with exponential backoff (honouring Retry-After) on 429, 5xx, timeouts and dropped
  connections; other HTTP errors stop the stage with a one-line error.
- A disk cache keyed by sha256 of the request body (model, prompt, decoding settings, seed): a rerun
  asks the endpoint nothing it has answered before.
- The API key comes from the environment variable named by `api_key_env`. It is sent only in the
  Authorization header, and is never logged, cached, written to outputs or put in error messages.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import requests

from ip2p.data.backends.base import Request
from ip2p.data.validate import few_shot_prefix, format_completion, format_prompt, load_human_examples, pick_examples
from ip2p.config import first_line
from ip2p.errors import Ip2pError
from ip2p.io import atomic_write_json

log = logging.getLogger(__name__)

ENDPOINT_PATHS = {"chat": "/chat/completions", "completions": "/completions"}


@dataclass(frozen=True)
class HttpPolicy:
    concurrency: int = 8
    timeout_s: float = 60.0
    retries: int = 5
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0


class ResponseCache:
    """One small JSON file per answered request, named by the hash of the request body."""

    def __init__(self, folder: str | Path | None):
        self.folder = Path(str(folder)).expanduser() if folder else None

    @staticmethod
    def key(body: dict) -> str:
        return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.json"

    def get(self, key: str) -> tuple[bool, str | None]:
        if self.folder is None or not self._path(key).is_file():
            return False, None
        try:
            return True, json.loads(self._path(key).read_text(encoding="utf-8"))["completion"]
        except (json.JSONDecodeError, KeyError, OSError):
            return False, None  # a damaged entry is asked again

    def put(self, key: str, completion: str | None) -> None:
        if self.folder is not None:
            atomic_write_json(self._path(key), {"completion": completion})


def extract_text(data: Any, endpoint: str) -> str | None:
    """The completion text of a response body, or None when the body has none."""
    try:
        choice = data["choices"][0]
        text = choice["message"]["content"] if endpoint == "chat" else choice["text"]
    except (KeyError, IndexError, TypeError):
        return None
    return text if isinstance(text, str) else None


class OpenAIBackend:
    def __init__(self, base_url: str, model: str, endpoint: str, decoding: dict, examples: list[dict],
                 system_prompt: str, api_key: str | None, policy: HttpPolicy, cache: ResponseCache,
                 batch_size: int = 32, send_seed: bool = True):
        if endpoint not in ENDPOINT_PATHS:
            raise Ip2pError(f"instructions.endpoint must be one of {list(ENDPOINT_PATHS)} (got '{endpoint}')")
        if policy.concurrency < 1:
            raise Ip2pError("instructions.concurrency must be at least 1")
        self.url = base_url.rstrip("/") + ENDPOINT_PATHS[endpoint]
        self.model, self.endpoint, self.decoding = model, endpoint, dict(decoding)
        self.examples, self.system_prompt = examples, system_prompt
        self._api_key = api_key
        self.policy, self.cache, self.batch_size, self.send_seed = policy, cache, batch_size, send_seed
        self.name = f"openai:{model}"
        self._local = threading.local()
        self.num_requests = 0  # HTTP requests actually sent (cache hits send none)
        self._count_lock = threading.Lock()

    @classmethod
    def from_config(cls, cfg) -> "OpenAIBackend":
        o = cfg.instructions
        api_key = os.environ.get(str(o.api_key_env)) if o.api_key_env else None
        if not api_key:
            log.info("no API key in $%s: sending requests without an Authorization header", o.api_key_env)
        examples = pick_examples(load_human_examples(o.examples), int(o.few_shot), int(cfg.seed)) if int(o.few_shot) else []
        s = o.decoding
        decoding = {"temperature": float(s.temperature), "top_p": float(s.top_p), "max_tokens": int(s.max_new_tokens),
                    "frequency_penalty": float(s.frequency_penalty), "stop": [str(s.stop)]}
        policy = HttpPolicy(int(o.concurrency), float(o.timeout_s), int(o.http_retries), float(o.backoff_s),
                            float(o.max_backoff_s))
        return cls(str(o.base_url), str(o.model), str(o.endpoint), decoding, examples, str(o.system_prompt or ""),
                   api_key, policy, ResponseCache(o.cache_dir), int(o.batch_size), bool(o.send_seed))

    # ---------------------------------------------------------------------------------- requests

    def request_body(self, req: Request) -> dict:
        body: dict[str, Any] = {"model": self.model, **self.decoding}
        if self.send_seed:
            body["seed"] = req.seed
        if self.endpoint == "chat":
            messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
            for e in self.examples:
                messages += [{"role": "user", "content": e["input"]},
                             {"role": "assistant", "content": format_completion(e["edit"], e["output"])}]
            body["messages"] = messages + [{"role": "user", "content": req.caption}]
        else:
            body["prompt"] = few_shot_prefix(self.examples) + format_prompt(req.caption)
        return body

    def _session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            session = requests.Session()
            session.headers["Content-Type"] = "application/json"
            if self._api_key:
                session.headers["Authorization"] = f"Bearer {self._api_key}"
            self._local.session = session
        return self._local.session

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    def _post(self, body: dict) -> Any:
        """The parsed JSON body of a successful response, retrying what is worth retrying."""
        p = self.policy
        problem = ""
        for attempt in range(p.retries + 1):
            wait = min(p.max_backoff_s, p.backoff_s * 2 ** attempt)
            try:
                with self._count_lock:
                    self.num_requests += 1
                resp = self._session().post(self.url, json=body, timeout=p.timeout_s)
            except (requests.Timeout, requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as err:
                problem = type(err).__name__  # ChunkedEncodingError: the connection dropped mid-response
            except requests.RequestException as err:  # a bad URL or scheme: retrying cannot help
                raise Ip2pError(f"cannot send a request to {self.url}: {type(err).__name__}: "
                                f"{self._redact(first_line(err))}") from err
            else:
                if resp.status_code == 200:
                    try:
                        return resp.json()
                    except ValueError:
                        return None  # not JSON: counted as an empty completion
                if resp.status_code != 429 and resp.status_code < 500:
                    raise Ip2pError(f"{self.url} refused the request: HTTP {resp.status_code} "
                                    f"{self._redact(resp.text[:200])!r}")
                problem = f"HTTP {resp.status_code}"
                retry_after = resp.headers.get("Retry-After", "")
                if retry_after.replace(".", "", 1).isdigit():
                    wait = min(p.max_backoff_s, float(retry_after))
            if attempt < p.retries:
                log.debug("%s: %s, retrying in %.2f s", self.url, problem, wait)
                time.sleep(wait)
        raise Ip2pError(f"{self.url} failed after {p.retries + 1} tries ({problem}); rerun to resume")

    def _complete_one(self, req: Request) -> str | None:
        body = self.request_body(req)
        # keyed by the per-record seed even when it is not sent: otherwise a retry, or a second edit of
        # the same caption, would get the first answer back from the cache (same key when it is sent)
        key = ResponseCache.key({**body, "seed": req.seed})
        hit, text = self.cache.get(key)
        if hit:
            return text
        text = extract_text(self._post(body), self.endpoint)
        self.cache.put(key, text)  # every answered request, useful or not: a rerun asks nothing again
        return text

    def complete(self, requests_: Sequence[Request]) -> list[str | None]:
        if not requests_:
            return []
        with ThreadPoolExecutor(max_workers=min(self.policy.concurrency, len(requests_))) as pool:
            return list(pool.map(self._complete_one, requests_))

    def close(self) -> None:
        self._local = threading.local()
