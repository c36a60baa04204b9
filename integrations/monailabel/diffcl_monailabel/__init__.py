"""MONAI Label integration of diffcl_algo: the bundle inference task, the server's request guards and its ASGI app.

Modules: :mod:`.guards` needs only the standard library; :mod:`.infer` and
:mod:`.asgi` import MONAI Label (its own environment: ``integrations/monailabel/setup_env.sh``). The MONAI Label app
is ``integrations/monailabel/app/main.py``; usage in ``docs/monailabel.md``.
"""
