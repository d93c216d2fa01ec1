"""The MoE layer and its parts: routers, dispatch/combine, grouped experts, losses."""
