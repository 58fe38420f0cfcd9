"""Scene representations: cameras, NeRF field, DMTet mesh, texture field."""
