"""The staff console: the newsletter in the browser, behind a login, under ``/staff/``.

``sessions`` keeps server-side sessions and their signed cookie; ``guard`` turns a request into
the staff member behind it (or a redirect to the login page, a 401 or a 403) and checks each
form's CSRF token. The pages call the same library functions as the command line.
"""
