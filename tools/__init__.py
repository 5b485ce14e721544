"""Repository tools: sample data, dataset preparation, verification, export and packaging."""
