"""Console entry points (absl flags): specdec-generate."""
