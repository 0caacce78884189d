-- The PostgreSQL role and database for provisioner's store (site.store: postgresql://...).
-- Run once as the superuser:   sudo -u postgres psql -v password="'...'" -f provisioner.sql
-- The password goes into /etc/provisioner/db-password (site.store_password_file), never into
-- the URL. provisioner creates and migrates its tables itself (`provisioner init`), so the role
-- owns its database and needs nothing else: no superuser, no CREATEDB, no CREATEROLE.
CREATE ROLE provisioner LOGIN PASSWORD :password NOSUPERUSER NOCREATEDB NOCREATEROLE;
CREATE DATABASE provisioner OWNER provisioner;
\connect provisioner
-- Nobody else uses the public schema of this database.
REVOKE ALL ON SCHEMA public FROM PUBLIC;
GRANT ALL ON SCHEMA public TO provisioner;
-- pg_hba.conf: let the provisioning hosts in with scram-sha-256, e.g.
--   hostssl provisioner provisioner 10.0.0.0/24 scram-sha-256
