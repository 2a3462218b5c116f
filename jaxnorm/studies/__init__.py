"""Reproductions of the five papers' claims: the harness and one study function per paper.

``python -m experiments.reproduce --paper=KEY --scale=smoke|cpu|full --workdir=DIR`` runs a study;
from Python, :func:`run_study` does the same with a config of ``experiments/configs/<KEY>.py``.

- ``harness``: :class:`Claim`, :class:`StudyDir` (resumable parts and training runs),
  :func:`run_study`, the claims table.
- ``panigrahi``: gradient variance across residual blocks (Panigrahi, Chen & Kuo 2018).
- ``bgn``: Backward Gradient Normalization in deep plain MLPs (Cabana & Lago-Fernandez 2021).
- ``skipinit``: BatchNorm's downscaling of residual branches, SkipInit (De & Smith 2020).
- ``bjorck``: BatchNorm allows larger learning rates (Bjorck, Gomes, Selman & Weinberger 2018).
- ``pws``: Parametric Weight Standardization, the shift of the average gradient (Liu, Ge, Li &
  Gui 2021).
"""

from jaxnorm.studies.harness import SCALES as SCALES
from jaxnorm.studies.harness import VERDICTS as VERDICTS
from jaxnorm.studies.harness import Claim as Claim
from jaxnorm.studies.harness import StudyDir as StudyDir
from jaxnorm.studies.harness import as_float as as_float
from jaxnorm.studies.harness import claims_markdown as claims_markdown
from jaxnorm.studies.harness import format_claims as format_claims
from jaxnorm.studies.harness import read_claims as read_claims
from jaxnorm.studies.harness import run_study as run_study
from jaxnorm.studies.harness import verdict_from as verdict_from
