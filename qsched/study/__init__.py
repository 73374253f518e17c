"""The paper's user study as a web app: pairwise human votes on an evaluation's images.

Modules: ``source`` (reads a ``qsched evaluate`` folder), ``design`` (questions, sides,
balanced assignment, gold questions; pure), ``gold`` (defective images), ``store`` (votes
behind a SQLAlchemy URL), ``service`` (the three joined), ``app`` (the Starlette app),
``stats`` (win rates, Bradley–Terry, intervals; pure), ``results`` (written outputs),
``simulate`` (a model as annotator, through the HTTP API), ``synthetic`` (a fake
evaluation folder for tests and demos). Nothing is imported here: ``import qsched``
stays light. See docs/study.md.
"""
