"""Community video rules: car gate plates, e-bikes in lifts, falls, objects thrown from height."""
