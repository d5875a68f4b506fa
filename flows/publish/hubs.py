"""Push the card to the model hubs (`<org>/<Model>-<Vendor>-FlagOS`) when their credentials are configured.

Hugging Face through `huggingface_hub` (token `HF_TOKEN`), ModelScope through `modelscope`'s HubApi (token
`MODELSCOPE_API_TOKEN`); the organisation is FLAGRELEASE_HUB_ORG. A hub without a token is reported as "not
published to hub", never silently skipped; tokens are passed to the clients and never logged.
"""

from __future__ import annotations

import os

from flows.errors import FlagReleaseError
from flows.publish.release import HubResult


class HubPublishFailed(FlagReleaseError):
    pass

HUB_TOKENS = {"huggingface": "HF_TOKEN", "modelscope": "MODELSCOPE_API_TOKEN"}


def publish_cards(org: str, title: str, card: str, fingerprint: str) -> list[HubResult]:
    results = []
    for hub, variable in HUB_TOKENS.items():
        repo = f"{org}/{title}"
        token = os.environ.get(variable)
        if not token:
            results.append(HubResult(hub=hub, repo=repo, published=False,
                                     detail=f"not published to hub: {variable} is not set"))
            continue
        try:
            UPLOADERS[hub](token, repo, card, fingerprint)
        except Exception as exc:  # any client failure is reported; the caller refuses to move `latest`
            message = str(exc).replace(token, "***")[:300]
            raise HubPublishFailed(f"{hub}: publishing the card to {repo} failed: {type(exc).__name__}: {message}") from None
        results.append(HubResult(hub=hub, repo=repo, published=True, detail=f"README.md of {repo} updated"))
    return results


def _huggingface(token: str, repo: str, card: str, fingerprint: str) -> None:
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo, exist_ok=True)
    api.upload_file(path_or_fileobj=card.encode(), path_in_repo="README.md", repo_id=repo,
                    commit_message=f"FlagOS release {fingerprint[:12]}")


def _modelscope(token: str, repo: str, card: str, fingerprint: str) -> None:
    from modelscope.hub.api import HubApi

    api = HubApi()
    api.login(token)
    api.create_repo(repo, exist_ok=True)
    api.upload_file(repo_id=repo, path_or_fileobj=card.encode(), path_in_repo="README.md",
                    commit_message=f"FlagOS release {fingerprint[:12]}")


UPLOADERS = {"huggingface": _huggingface, "modelscope": _modelscope}
