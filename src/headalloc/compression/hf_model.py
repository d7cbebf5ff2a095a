"""placeholder: compressed model classes are registered here."""
