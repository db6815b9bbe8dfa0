-- Runs once, on the first start of an empty Postgres volume (docker-entrypoint-initdb.d), as the
-- superuser that owns the Airflow metadata database. Creates the mmpipe catalog database with its
-- own role, so the pipeline's data and Airflow's bookkeeping never share credentials.
-- The password comes from the container environment (psql >= 15 \getenv), not from this file;
-- if it is unset the CREATE ROLE fails and the entrypoint (ON_ERROR_STOP) stops the container.
\getenv catalog_password CATALOG_DB_PASSWORD

CREATE ROLE mmpipe LOGIN PASSWORD :'catalog_password';
CREATE DATABASE mmpipe OWNER mmpipe;
REVOKE ALL ON DATABASE mmpipe FROM PUBLIC;
