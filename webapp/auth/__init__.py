"""Sign in and out, the account page, personal API tokens."""
