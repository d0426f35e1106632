"""About this model: the served model's card, readable from the product."""
