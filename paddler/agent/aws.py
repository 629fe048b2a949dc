"""Resolving ``aws:metadata:local-ipv4`` through the EC2 instance metadata service (IMDSv2)."""

import httpx

SESSION_SECONDS = "60"


class MetadataError(RuntimeError):
    pass


def local_ipv4(metadata_url: str, timeout: float = 2.0) -> str:
    base = metadata_url.rstrip("/")
    try:
        with httpx.Client(timeout=timeout) as http:
            token = http.put(
                f"{base}/latest/api/token",
                headers={"X-aws-ec2-metadata-token-ttl-seconds": SESSION_SECONDS},
            )
            token.raise_for_status()
            answer = http.get(
                f"{base}/latest/meta-data/local-ipv4",
                headers={"X-aws-ec2-metadata-token": token.text},
            )
            answer.raise_for_status()
    except httpx.HTTPError as error:
        raise MetadataError(
            f"cannot ask the instance metadata service at {base} for local-ipv4: {error}"
        ) from None
    return answer.text.strip()
