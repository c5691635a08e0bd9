"""``.../branches/{id}/functions``: placeholder until the functions face lands."""

from __future__ import annotations

from fastapi import APIRouter

from phloem.control.neon_v2.errors import NeonRoute

router = APIRouter(route_class=NeonRoute)
