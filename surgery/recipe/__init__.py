"""Floor 5: recipes (YAML front end to the graph)."""

from surgery.recipe.build import Recipe, build_recipe, load_recipe, parse_recipe
from surgery.recipe.run import PlanReport, plan_recipe, run_recipe

__all__ = ["PlanReport", "Recipe", "build_recipe", "load_recipe", "parse_recipe",
           "plan_recipe", "run_recipe"]
