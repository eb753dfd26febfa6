import re
from pathlib import Path

from payments.config import PaymentSettings

ROOT = Path(__file__).resolve().parents[1]


def test_env_example_lists_every_setting() -> None:
    documented = set(re.findall(r"^([A-Z0-9_]+)=", (ROOT / ".env.example").read_text(), flags=re.M))
    settings = {name.upper() for name in PaymentSettings.model_fields}
    assert documented == settings


def test_readme_documents_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [name.upper() for name in PaymentSettings.model_fields if name.upper() not in readme]
    assert missing == []
