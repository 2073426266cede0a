"""Which BentoML model-store model the service loads when ``RESDEPLOY_ARTIFACTS`` is not set.

In order:

1. ``RESDEPLOY_BENTO_MODEL``, when set and not empty (it always wins, also in a Bento);
2. when this code runs from a built Bento (``bentoml serve TAG``, ``bentoml serve DIR``, the
   container): the model the Bento recorded at build time. ``bentoml build`` writes the models the
   service referenced, exact version included, into the Bento's ``bento.yaml``; this reads them
   back, so a Bento serves the model it packed with no variable set;
3. else ``resdeploy-digits:latest`` (``bentoml serve serving.service:Classifier``, ``bentoml build``).

Why bento.yaml: BentoML keeps the project's files under the Bento's ``src/`` with ``bento.yaml``
beside it, in the local Bento store, an exported Bento and the image (``$BENTO_PATH``) alike, so
this file's own location says whether it runs from a Bento, before the service class exists
(``Service.bento`` is set only after the import). docs/design.md, "Bento model selection".
"""

from __future__ import annotations

import os
from pathlib import Path

from core.errors import ConfigError

ENV = "RESDEPLOY_BENTO_MODEL"
DEFAULT = "resdeploy-digits:latest"
_SERVE_FIX = f"set {ENV}=NAME[:VERSION] (a stored model) or RESDEPLOY_ARTIFACTS=DIR to serve it"


def running_bento(module_file: str = __file__) -> Path | None:
    """The Bento directory this code was loaded from (``<bento>/src/serving/bento_model.py``), else None.

    ``abspath``, not ``resolve``: a Bento's copy of a symlinked project file is a symlink, and it
    still belongs to the Bento it sits in.
    """
    src = Path(os.path.abspath(module_file)).parents[1]
    if src.name == "src" and (src.parent / "bento.yaml").is_file():
        return src.parent
    return None


def recorded_models(bento: Path) -> tuple[str, list[str]]:
    """``(the Bento's tag, the BentoML model tags it recorded)``: the models its entry service
    referenced when it was built; if none, the models its bentofile's ``models:`` packed.

    Raises:
        ConfigError: ``bento.yaml`` cannot be read.
    """
    import yaml  # a BentoML dependency, so in every image that runs the service

    path = bento / "bento.yaml"
    try:
        info = yaml.load(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        tag = f"{info.get('name', '?')}:{info.get('version', '?')}"
        entry = info.get("entry_service")
        services = [s for s in info.get("services") or [] if not entry or s.get("name") == entry]

        def tags(models) -> list[str]:  # registry "bentoml" is the default and left out of the file
            return [str(m["tag"]) for m in models or [] if m.get("registry", "bentoml") == "bentoml"]

        own = [t for s in services for t in tags(s.get("models"))]
        return tag, list(dict.fromkeys(own or tags(info.get("models"))))
    except (OSError, yaml.YAMLError, AttributeError, KeyError, TypeError) as e:
        why = " ".join(str(e).split())  # one line: YAML errors span several
        raise ConfigError(f"cannot read the Bento's {path} ({why}): {_SERVE_FIX}") from None


def _check_stored(tag: str, bento_tag: str) -> None:
    """Fail now, in one line, rather than in every worker (which BentoML restarts forever)."""
    import bentoml

    try:
        bentoml.models.get(tag)  # the Bento's models/ in an image, else $BENTOML_HOME/models
    except bentoml.exceptions.NotFound:
        raise ConfigError(f"the Bento {bento_tag} was built with model {tag}, which neither the Bento's models/ "
                          "nor the BentoML model store holds: import it (`bentoml models import`) or rebuild, or "
                          f"{_SERVE_FIX}") from None


def bento_model_tag(environ=os.environ, bento: Path | None | str = "detect") -> str:
    """The model-store tag to serve (see the module docstring).

    Args:
        environ: where ``RESDEPLOY_BENTO_MODEL`` is read.
        bento: the Bento directory to read, None for none, ``"detect"`` for the one this code runs from.

    Raises:
        ConfigError: in a Bento with no variable set, the Bento recorded no model or several, or
            its model is not in the store. One line naming the fix.
    """
    chosen = environ.get(ENV, "").strip()
    if chosen:
        return chosen
    if bento == "detect":
        bento = running_bento()
    if bento is None:
        return DEFAULT
    bento_tag, models = recorded_models(Path(bento))
    if not models:
        raise ConfigError(f"the Bento {bento_tag} packs no model (was it built with RESDEPLOY_ARTIFACTS set?): "
                          f"rebuild it with `{ENV}=NAME bentoml build` and no RESDEPLOY_ARTIFACTS, or {_SERVE_FIX}")
    if len(models) > 1:
        raise ConfigError(f"the Bento {bento_tag} packs several models ({', '.join(models)}) and none is chosen: "
                          f"set {ENV} to one of them")
    _check_stored(models[0], bento_tag)
    return models[0]
