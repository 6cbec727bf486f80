"""pytest plugin: run timm's own ``tests/test_models.py`` on the ``muse_vit_*`` models.

It registers the models and lets timm's model filters treat ``muse_vit_*`` as they treat ``vit_*``
(the transformer models' non-standard spatial API) and their module as timm's ``vision_transformer``
(forward_intermediates and the features_only getter); TorchScript, which MUSE does not support, is
deselected. Usage (docs/timm.md, "timm's own model tests")::

    PYTHONPATH=tests/timm_suite python -m pytest -p muse_timm_plugin <timm sdist>/tests/test_models.py -k muse_vit
"""
import timm

import muse_lightning  # noqa: F401  (registers the models)

_list_models = timm.list_models


def _with_muse(patterns):
    if isinstance(patterns, str):
        patterns = [patterns]
    patterns = list(patterns or [])
    return patterns + ["muse_" + p for p in patterns if p.startswith("vit_")]


def _list_models_with_muse(filter="", module="", *args, exclude_filters="", **kwargs):
    if module and "vision_transformer" in ([module] if isinstance(module, str) else module):
        module = [module] if isinstance(module, str) else list(module)
        module.append("vit")  # muse_lightning.vit, where the muse_vit_* models are registered
    filter = _with_muse(filter) if filter else filter
    return _list_models(filter, module, *args, exclude_filters=_with_muse(exclude_filters), **kwargs)


def pytest_configure(config):
    timm.list_models = _list_models_with_muse


def pytest_collection_modifyitems(config, items):
    scripted = [i for i in items if "muse_vit" in i.name and "torchscript" in i.name and "fx" not in i.name]
    if scripted:
        config.hook.pytest_deselected(items=scripted)
        items[:] = [i for i in items if i not in scripted]
