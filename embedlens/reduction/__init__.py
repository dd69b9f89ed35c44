"""Token reduction at matched budgets: one budget meaning shared by every method (`budget`)."""
