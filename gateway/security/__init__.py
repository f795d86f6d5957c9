"""Authentication and authorization: tokens → principal → access policy (enforced in the store)."""
